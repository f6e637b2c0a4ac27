"""Stand-in for crowsonkb/k-diffusion (as A1111 puts it on sys.path): external + sampling subsets."""
from . import external, sampling, utils  # noqa: F401
