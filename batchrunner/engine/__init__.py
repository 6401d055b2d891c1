"""One run: the dispatcher and its collaborators (creates, watching, reconciling, cancels, uploads, results)."""
