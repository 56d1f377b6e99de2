"""GPT-2's published files and PEFT's adapter format, read and written."""
