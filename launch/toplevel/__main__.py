"""`python -m unison ...` (and `torchrun -m unison ...`) runs the CLI."""

from unison.launch.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
