"""Stand-ins for the outside world that speak its real wire protocols, for tests."""
