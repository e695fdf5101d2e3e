"""`python -m loadtest ...`: the same as `leanserve loadtest ...`."""

import argparse
import sys

from loadtest.cli import add_arguments, main

parser = argparse.ArgumentParser(prog="python -m loadtest", description="leanserve load tester")
add_arguments(parser)
sys.exit(main(parser.parse_args()))
