"""``python -m services.enforcer``: run the enforcer service."""

from services.enforcer.bootstrap import main

if __name__ == "__main__":
    main()
