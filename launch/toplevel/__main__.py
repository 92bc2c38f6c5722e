"""`python -m unison ...` (and `torchrun -m unison ...`) runs the CLI, as the `unison` command does."""

from unison.launch.cli import entry

if __name__ == "__main__":
    entry()
