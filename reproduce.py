"""One command per table of the paper (`python reproduce.py --help`); the code is in repro/."""
import cli
from repro.command import main

if __name__ == '__main__':
    cli.run_main(main)
