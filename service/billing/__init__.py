"""Billing: the client the service uses, and the emulator used by dev and the tests."""
