"""`python -m kokoro_helpers.report`: `make report`'s entry point; the code is in `kokoro_helpers.report.index`."""
from kokoro_helpers.report.index import main

if __name__ == "__main__":
    raise SystemExit(main())
