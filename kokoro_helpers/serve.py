"""`python -m kokoro_helpers.serve`: the command-line entry point kept at its old name; the code is in
`kokoro_helpers.local.serve`."""
from kokoro_helpers.local.serve import main

if __name__ == "__main__":
    raise SystemExit(main())
