"""``python -m bridgectl``: the same as the ``bridgectl`` console script."""

from bridgectl.main import console_main

console_main()
