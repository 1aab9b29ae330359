"""``python -m hf_psgd`` (and ``accelerate launch -m hf_psgd``): the ``hf-psgd`` command."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
