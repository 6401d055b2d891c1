"""The only code that speaks HTTP to the API: the client, its error mapping, the key's mask."""
