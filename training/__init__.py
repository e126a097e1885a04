"""CPO/ORPO training on a published triplet version: losses, data, and one readable loop."""
