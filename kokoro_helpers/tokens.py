"""`python -m kokoro_helpers.tokens`: the command-line entry point kept at its old name; the code is in
`kokoro_helpers.data.tokens`."""
from kokoro_helpers.data.tokens import main

if __name__ == "__main__":
    raise SystemExit(main())
