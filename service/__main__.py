"""`python -m service` is `fleet-payouts`."""

from service.cli import main

main()
