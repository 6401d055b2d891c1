"""What lasts on disk: the ledger and its replay, the output folder, its files and names."""
