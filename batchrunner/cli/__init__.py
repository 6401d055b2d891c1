"""The command line: argparse, each command's wiring, exit codes; no business logic."""
