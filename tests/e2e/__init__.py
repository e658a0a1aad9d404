"""End-to-end tests: real processes, and the dashboard in a real browser."""
