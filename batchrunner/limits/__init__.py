"""The request window and the in-flight gate; the account's shared limits and their stores."""
