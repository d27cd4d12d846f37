"""``python -m lorafleet_gateway``."""

from lorafleet_gateway.main import main

if __name__ == "__main__":
    main()
