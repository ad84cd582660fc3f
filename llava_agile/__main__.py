"""`python -m llava_agile COMMAND ...`: analyze, calibrate, visualize, demo."""
import sys

from .analysis.cli import main

if __name__ == "__main__":
    sys.exit(main())
