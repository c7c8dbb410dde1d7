"""Data: reading local text files and the tokenizer that turns them into token ids."""
