"""``peftkit compare``: fine-tune a real model with full fine-tuning and with PEFT methods, side by side."""
