"""`python -m detoxrl.train` and `accelerate launch -m detoxrl.train`."""
from detoxrl.train.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
