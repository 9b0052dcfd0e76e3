"""`python -m detoxrl.eval` and `accelerate launch -m detoxrl.eval`."""
from detoxrl.eval.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
