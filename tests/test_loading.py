"""Loading and saving mamba_ssm- and HF-format checkpoints on CPU."""

import json
import math

import pytest
import torch

import ssm_reduce
from ssm_reduce.loading import CheckpointError

from .conftest import random_tokens


def mamba_ssm_checkpoint(directory, layer, fmt="bin", tie=True, n_layer=2):
    """A mamba_ssm-format checkpoint written by hand: real config keys, real state-dict key names,
    shapes worked out from the mamba_ssm module definitions (d_model 32, ``n_layer`` layers, vocab 61 -> 64)."""
    d, vocab, state = 32, 64, 8
    d_inner = 2 * d
    gen = torch.Generator().manual_seed(7)
    rnd = lambda *shape: torch.randn(*shape, generator=gen) * 0.2  # noqa: E731
    sd = {"backbone.embedding.weight": rnd(vocab, d), "backbone.norm_f.weight": 1 + rnd(d)}
    for i in range(n_layer):
        p = f"backbone.layers.{i}."
        sd[p + "norm.weight"] = 1 + rnd(d)
        if layer == "Mamba2":
            heads, conv_dim = d_inner // 8, d_inner + 2 * state
            sd.update({
                p + "mixer.in_proj.weight": rnd(2 * d_inner + 2 * state + heads, d),
                p + "mixer.conv1d.weight": rnd(conv_dim, 1, 4), p + "mixer.conv1d.bias": rnd(conv_dim),
                p + "mixer.dt_bias": rnd(heads), p + "mixer.A_log": torch.log(torch.arange(1, heads + 1.0)),
                p + "mixer.D": 1 + rnd(heads), p + "mixer.norm.weight": 1 + rnd(d_inner),
                p + "mixer.out_proj.weight": rnd(d, d_inner),
            })
        else:
            rank = math.ceil(d / 16)
            sd.update({
                p + "mixer.in_proj.weight": rnd(2 * d_inner, d),
                p + "mixer.conv1d.weight": rnd(d_inner, 1, 4), p + "mixer.conv1d.bias": rnd(d_inner),
                p + "mixer.x_proj.weight": rnd(rank + 2 * state, d_inner),
                p + "mixer.dt_proj.weight": rnd(d_inner, rank), p + "mixer.dt_proj.bias": rnd(d_inner) - 3,
                p + "mixer.A_log": torch.log(torch.arange(1, state + 1.0)).repeat(d_inner, 1),
                p + "mixer.D": 1 + rnd(d_inner), p + "mixer.out_proj.weight": rnd(d, d_inner),
            })
    sd["lm_head.weight"] = sd["backbone.embedding.weight"] if tie else rnd(vocab, d)
    ssm_cfg = {"layer": "Mamba2", "d_state": state, "headdim": 8, "chunk_size": 16} if layer == "Mamba2" else {"d_state": state}
    config = {"d_model": d, "d_intermediate": 0, "n_layer": n_layer, "vocab_size": 61, "ssm_cfg": ssm_cfg,
              "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True,
              "fused_add_norm": True, "pad_vocab_size_multiple": 8, "tie_embeddings": tie}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    if fmt == "bin":
        torch.save(sd, directory / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items() if k != "lm_head.weight" or not tie}, directory / "model.safetensors")
    return sd


def reference_model(layer, sd, tie=True):
    """The transformers model built from a hand-written config, weights mapped by hand."""
    from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

    if layer == "Mamba2":
        model = Mamba2ForCausalLM(Mamba2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=8,
                                               head_dim=8, num_heads=8, n_groups=1, chunk_size=16, expand=2,
                                               tie_word_embeddings=tie))
    else:
        model = MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=8,
                                             time_step_rank=2, tie_word_embeddings=tie))
    mapped = {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in sd.items()}
    model.load_state_dict(mapped, strict=True)
    return model.eval()


@pytest.mark.parametrize("layer", ["Mamba2", "Mamba1"])
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
@pytest.mark.parametrize("tie", [True, False])
@torch.no_grad()
def test_mamba_ssm_checkpoint_loads_as_transformers_model(tmp_path, layer, fmt, tie):
    sd = mamba_ssm_checkpoint(tmp_path / "ckpt", layer, fmt, tie)
    model = ssm_reduce.load_model(tmp_path / "ckpt")
    assert type(model).__name__ == ("Mamba2ForCausalLM" if layer == "Mamba2" else "MambaForCausalLM")
    assert model.config.vocab_size == 64 and model.config.tie_word_embeddings is tie
    if layer == "Mamba2":
        assert model.config.n_groups == 1
    ids = random_tokens(2, 37)
    assert torch.equal(model(ids).logits, reference_model(layer, sd, tie)(ids).logits)


@pytest.mark.parametrize("layer", ["Mamba2", "Mamba1"])
@torch.no_grad()
def test_round_trips(tmp_path, layer):
    mamba_ssm_checkpoint(tmp_path / "ckpt", layer)
    model = ssm_reduce.load_model(tmp_path / "ckpt", dtype=torch.float32)
    ids = random_tokens(1, 29)
    ref = model(ids).logits
    # mamba_ssm -> HF -> load
    ssm_reduce.save_model(model, tmp_path / "hf", format="hf")
    again = ssm_reduce.load_model(tmp_path / "hf")
    assert torch.equal(again(ids).logits, ref)
    # -> mamba_ssm -> load: same config and weights
    ssm_reduce.save_model(again, tmp_path / "ssm", format="mamba_ssm")
    config = json.loads((tmp_path / "ssm" / "config.json").read_text())
    assert config["d_model"] == 32 and config["n_layer"] == 2 and config["tie_embeddings"] is True
    keys = torch.load(tmp_path / "ssm" / "pytorch_model.bin", weights_only=True).keys()
    assert "backbone.embedding.weight" in keys and "backbone.embeddings.weight" not in keys
    third = ssm_reduce.load_model(tmp_path / "ssm")
    assert torch.equal(third(ids).logits, ref)
    for (k, a), (_, b) in zip(model.state_dict().items(), third.state_dict().items()):
        assert torch.equal(a, b), k


def test_dtype_and_device(tmp_path):
    mamba_ssm_checkpoint(tmp_path / "ckpt", "Mamba2")
    model = ssm_reduce.load_model(tmp_path / "ckpt", dtype=torch.bfloat16, device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_errors_name_the_file_and_key(tmp_path):
    ckpt = tmp_path / "ckpt"
    sd = mamba_ssm_checkpoint(ckpt, "Mamba2")
    bin_path = ckpt / "pytorch_model.bin"
    data = bin_path.read_bytes()
    bin_path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: truncated or not a torch checkpoint"):
        ssm_reduce.load_model(ckpt)
    # unexpected key
    torch.save({**sd, "backbone.layers.0.mixer.extra": torch.zeros(3)}, bin_path)
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: unexpected key 'backbone.layers.0.mixer.extra'"):
        ssm_reduce.load_model(ckpt)
    # shape mismatch
    torch.save({**sd, "backbone.layers.1.mixer.D": torch.zeros(5)}, bin_path)
    with pytest.raises(CheckpointError, match=r"key 'backbone.layers.1.mixer.D' has shape \(5,\), the config implies \(8,\)"):
        ssm_reduce.load_model(ckpt)
    # missing key
    torch.save({k: v for k, v in sd.items() if k != "backbone.norm_f.weight"}, bin_path)
    with pytest.raises(CheckpointError, match=r"missing key 'backbone.norm_f.weight'"):
        ssm_reduce.load_model(ckpt)
    # code in the pickle is refused, not executed
    torch.save({"weights": sd, "hook": UnsafeObject()}, bin_path)
    with pytest.raises(CheckpointError, match="refused: the pickle holds objects other than tensors"):
        ssm_reduce.load_model(ckpt)
    assert not UnsafeObject.ran
    # config problems
    torch.save(sd, bin_path)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "n_layer"}))
    with pytest.raises(CheckpointError, match=r"config.json: missing key 'n_layer'"):
        ssm_reduce.load_model(ckpt)
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json: not valid JSON"):
        ssm_reduce.load_model(ckpt)
    (ckpt / "config.json").write_text(json.dumps({**config, "attn_layer_idx": [1]}))
    with pytest.raises(CheckpointError, match="attention layers"):
        ssm_reduce.load_model(ckpt)
    for ssm_cfg, match in [("abc", r"key 'ssm_cfg' must be an object of layer options, got 'abc'"),
                           ({**config["ssm_cfg"], "d_state": "8"}, r"ssm_cfg key 'd_state' must be a positive integer, got '8'"),
                           ({**config["ssm_cfg"], "rmsnorm": 1}, r"ssm_cfg key 'rmsnorm' must be true or false, got 1"),
                           ({**config["ssm_cfg"], "dt_limit": [0.0]}, r"ssm_cfg key 'dt_limit' must be a pair of numbers"),
                           ({"layer": "Mamba1", "dt_rank": "big"}, r"ssm_cfg key 'dt_rank' must be a positive integer or 'auto'")]:
        (ckpt / "config.json").write_text(json.dumps({**config, "ssm_cfg": ssm_cfg}))
        with pytest.raises(CheckpointError, match=r"config.json: " + match):
            ssm_reduce.load_model(ckpt)
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="dtype must be a torch dtype or its name"):
        ssm_reduce.load_model(ckpt, dtype="float33")
    with pytest.raises(ValueError, match="device='nowhere' is not a device"):
        ssm_reduce.load_model(ckpt, device="nowhere")
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config.json: missing"):
        ssm_reduce.load_model(ckpt)
    with pytest.raises(ValueError, match="host must be"):
        ssm_reduce.load_model(ckpt, host="jax")


class UnsafeObject:
    ran = False

    def __reduce__(self):
        return (UnsafeObject._run, ())

    @staticmethod
    def _run():
        UnsafeObject.ran = True
        return "ran"


def test_hf_checkpoint_with_code_in_its_pickle_is_refused(tmp_path):
    from .conftest import tiny_mamba

    model = tiny_mamba()
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()  # weights as a pickle that runs code when unpickled
    torch.save({**model.state_dict(), "hook": UnsafeObject()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"needs more than plain tensors to load \(refused, nothing of it was run"):
        ssm_reduce.load_model(str(tmp_path))
    assert not UnsafeObject.ran


def test_hf_checkpoint_loads_as_is(tmp_path):
    from .conftest import tiny_mamba

    model = tiny_mamba()
    model.save_pretrained(tmp_path)
    loaded = ssm_reduce.load_model(str(tmp_path))
    ids = random_tokens(1, 20)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_mamba_ssm_host_needs_mamba_ssm(tmp_path):
    import importlib.util

    if importlib.util.find_spec("mamba_ssm") is not None:
        pytest.skip("mamba_ssm is installed; its host is tested in the GPU suite")
    mamba_ssm_checkpoint(tmp_path / "ckpt", "Mamba2")
    with pytest.raises(ImportError, match="host='mamba_ssm' needs the mamba_ssm package"):
        ssm_reduce.load_model(tmp_path / "ckpt", host="mamba_ssm")


def test_cli_and_lm_eval_accept_mamba_ssm_checkpoints(tmp_path, capsys):
    from ssm_reduce import cli
    from ssm_reduce.embedded import byte_tokenizer

    ckpt = tmp_path / "ckpt"
    mamba_ssm_checkpoint(ckpt, "Mamba2")
    byte_tokenizer().save_pretrained(ckpt)  # bytes below 64 (digits, spaces) fit the 64-entry vocabulary
    text = tmp_path / "digits.txt"
    text.write_text(" ".join(str(i * 7919 % 1000) for i in range(400)))
    code = cli.main(["ppl", "--model", str(ckpt), "--windows", "2", "--window", "128", "--scored", "16",
                     "--text-file", str(text), "--method", "evit"])
    assert code == 0 and "evit" in capsys.readouterr().out
    pytest.importorskip("lm_eval", reason="lm-eval is not installed")
    from ssm_reduce.integrations.lm_eval import ReducedLM

    lm = ReducedLM(pretrained=str(ckpt), device="cpu", method="utr", keep_ratio=0.8)
    assert type(lm.model).__name__ == "Mamba2ForCausalLM" and ssm_reduce.is_patched(lm.model)


@pytest.mark.parametrize("layer", ["Mamba2", "Mamba1"])
def test_a_mamba_ssm_checkpoint_keeps_its_dtype(tmp_path, layer):
    """Without ``dtype`` a model loads in the dtype its checkpoint stores (as transformers does for its
    own format), and ``save_model`` / ``load_model`` round-trip a bfloat16 model exactly."""
    sd = mamba_ssm_checkpoint(tmp_path / "ckpt", layer)
    torch.save({k: v.bfloat16() for k, v in sd.items()}, tmp_path / "ckpt" / "pytorch_model.bin")
    model = ssm_reduce.load_model(tmp_path / "ckpt")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ssm_reduce.save_model(model, tmp_path / "again", format="mamba_ssm")
    again = ssm_reduce.load_model(tmp_path / "again")
    ids = random_tokens(1, 20)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    assert ssm_reduce.load_model(tmp_path / "ckpt", dtype="float32").dtype == torch.float32


def test_init_only_layer_options_are_accepted(tmp_path):
    """Layer options of mamba_ssm that only shape the initialisation or pick a kernel load (nothing to
    convert); an invalid vocabulary padding is a checkpoint error."""
    ckpt = tmp_path / "ckpt"
    for layer, extra in (("Mamba2", {"dt_init_floor": 1e-4, "A_init_range": [1, 16], "use_mem_eff_path": False,
                                     "conv_init": None}),
                         ("Mamba1", {"dt_init": "random", "dt_scale": 1.0, "use_fast_path": True})):
        mamba_ssm_checkpoint(ckpt, layer)
        config = json.loads((ckpt / "config.json").read_text())
        reference = ssm_reduce.load_model(ckpt)
        (ckpt / "config.json").write_text(json.dumps({**config, "ssm_cfg": {**config["ssm_cfg"], **extra}}))
        ids = random_tokens(1, 20)
        with torch.no_grad():
            assert torch.equal(ssm_reduce.load_model(ckpt)(ids).logits, reference(ids).logits)
    for multiple in (0, None, "8"):
        (ckpt / "config.json").write_text(json.dumps({**config, "pad_vocab_size_multiple": multiple}))
        with pytest.raises(CheckpointError, match="'pad_vocab_size_multiple' must be a positive integer"):
            ssm_reduce.load_model(ckpt)


def test_a_damaged_hf_checkpoint_is_a_checkpoint_error(tmp_path, capsys):
    from ssm_reduce import cli

    from .conftest import tiny_mamba

    tiny_mamba().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=str(tmp_path) + r": could not be loaded \(SafetensorError"):
        ssm_reduce.load_model(tmp_path)
    assert cli.main(["ppl", "--model", str(tmp_path), "--windows", "1"]) == 2
    assert "could not be loaded" in capsys.readouterr().err


def test_hub_ids_download_one_weight_format_and_no_weights_for_the_format(tmp_path, monkeypatch):
    """A hub id (the hub faked here): finding its format or tokenizer downloads no weights; loading it
    downloads one format of them (safetensors where the repository has both)."""
    import huggingface_hub

    from .conftest import tiny_mamba

    tiny_mamba().save_pretrained(tmp_path)
    torch.save({}, tmp_path / "pytorch_model.bin")  # a repository holding both formats
    asked = []
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo: [p.name for p in tmp_path.iterdir()])

    def snapshot(repo, allow_patterns):
        asked.append(sorted(allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    assert ssm_reduce.loading.checkpoint_format("someone/tiny-mamba") == "hf"
    assert not any(p in asked[-1] for p in ("*.bin", "*.safetensors"))
    model = ssm_reduce.load_model("someone/tiny-mamba")
    assert type(model).__name__ == "MambaForCausalLM"
    assert "*.safetensors" in asked[-1] and "*.bin" not in asked[-1]
