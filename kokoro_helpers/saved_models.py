"""`python -m kokoro_helpers.saved_models`: the command-line entry point kept at its old name; the code is in
`kokoro_helpers.models.saved_models`."""
from kokoro_helpers.models.saved_models import main

if __name__ == "__main__":
    raise SystemExit(main())
