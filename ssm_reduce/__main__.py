"""``python -m ssm_reduce ...`` (also ``accelerate launch -m ssm_reduce eval ...``)."""

import sys

from .cli import main

sys.exit(main())
