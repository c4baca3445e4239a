"""Shared fixtures: tiny Mamba / Mamba-2 models built from configs (no downloads)."""

import logging

import pytest
import torch

import ssm_reduce

# transformers logs a fallback notice for every missing optional kernel package; the tests use the
# torch paths on purpose.
logging.getLogger("transformers").setLevel(logging.ERROR)
try:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
except ImportError:  # pragma: no cover
    pass

VOCAB = 64


def mamba2_scan_args(b, l, h, p, g, n, dtype=torch.float32, device="cpu", seed=0, noncontiguous=False):
    """Random operands of a Mamba-2 scan (``ops.scan_score_mamba2``): x (b, l, h, p), dt, B and C with g
    groups of state size n in ``dtype``, float32 A, D, dt_bias. ``noncontiguous``: x and B are strided
    views (every other head / state channel of larger tensors)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, device=device)  # noqa: E731
    x, dt, B, C = r(b, l, h, p), r(b, l, h), r(b, l, g, n), r(b, l, g, n)
    if noncontiguous:
        x = r(b, l, 2 * h, p)[:, :, ::2]
        B = r(b, l, g, 2 * n)[..., ::2]
    return dict(x=x.to(dtype), dt=dt.to(dtype), A=-torch.rand(h, generator=gen, device=device) - 0.05,
                B=B.to(dtype), C=C.to(dtype), D=r(h), dt_bias=0.1 * r(h))


def assert_close_to_max(got, ref, tol, what=""):
    """Each of a scan's outputs (y, final state, score, sqnorm) within ``tol`` of the reference's, the
    largest difference measured against the reference's largest magnitude (the comparison for outputs
    computed from operands rounded to 16 bits, whose small entries carry the big ones' rounding)."""
    for name, a, b in zip(("y", "final state", "score", "sqnorm"), got, ref):
        err = float((a.float() - b.float()).abs().max()) / (float(b.float().abs().max()) + 1e-6)
        assert err <= tol, f"{what}: {name} differs from the reference by {err:.2e} (relative to its max) > {tol}"


def tiny_mamba2(layers=6, seed=0, **overrides):
    from transformers import Mamba2Config, Mamba2ForCausalLM

    kwargs = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, expand=2, head_dim=8, num_heads=8,
        n_groups=1, state_size=8, conv_kernel=4, chunk_size=16, pad_token_id=0, bos_token_id=1,
        eos_token_id=1,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return Mamba2ForCausalLM(Mamba2Config(**kwargs)).eval()


def tiny_mamba(layers=6, seed=0, **overrides):
    from transformers import MambaConfig, MambaForCausalLM

    kwargs = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, state_size=8, conv_kernel=4,
        pad_token_id=0, bos_token_id=1, eos_token_id=1,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return MambaForCausalLM(MambaConfig(**kwargs)).eval()


FAMILIES = {"mamba2": tiny_mamba2, "mamba": tiny_mamba}


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


@pytest.fixture
def model(family):
    return FAMILIES[family]()


def random_tokens(batch, length, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (batch, length), generator=gen)


def left_padded(batch, length, pads, seed=1):
    """Token ids and mask with ``pads[b]`` padding tokens on the left of row b."""
    ids = random_tokens(batch, length, seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b, p in enumerate(pads):
        mask[b, :p] = 0
    return torch.where(mask.bool(), ids, 0), mask


def state_dict_copy(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_model(model, reference_state, reference_class):
    assert type(model) is reference_class
    assert not ssm_reduce.is_patched(model)
    state = model.state_dict()
    assert state.keys() == reference_state.keys()
    for k, v in reference_state.items():
        assert torch.equal(state[k], v), k


def ops_anchor_setup(seq_len=37):
    """A mixer input and an open reduction session, for calling an adapter's ops-path anchor mixer
    directly (similarity from y, so y itself is captured)."""
    from ssm_reduce.runtime import Runtime, Session, TokenState

    x = torch.randn(2, seq_len, 32, generator=torch.Generator().manual_seed(0))
    config = ssm_reduce.ReduceConfig(keep_ratio=0.7, similarity_source="ssm").resolve(6, 4)
    return x, Session(Runtime(config), TokenState.initial(2, seq_len, torch.device("cpu")), torch.long)


def assert_captured_pre_gate_y(session, mixer, x, mamba2: bool) -> torch.Tensor:
    """The session holds y before the gate and its clip scores; for Mamba-2, y is the tensor the host
    mixer feeds its gated norm."""
    from ssm_reduce.reduce import importance_scores

    y = session.captured["ssm"]
    assert torch.equal(session.captured_scores[("ssm", "clip")], importance_scores(y, "clip"))
    if mamba2:
        seen = {}
        handle = mixer.norm.register_forward_pre_hook(lambda m, a: seen.setdefault("y", a[0]))
        mixer(x)
        handle.remove()
        torch.testing.assert_close(y, seen["y"], atol=1e-5, rtol=1e-5)
    return y
