"""`python -m kokoro_helpers.train_lora`: the command-line entry point kept at its old name; the code is in
`kokoro_helpers.local.train_lora`."""
from kokoro_helpers.local.train_lora import main

if __name__ == "__main__":
    raise SystemExit(main())
