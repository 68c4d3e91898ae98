"""``python -m fp8train`` (and ``torchrun -m fp8train``): the lab's command line."""

from fp8train.lab.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
