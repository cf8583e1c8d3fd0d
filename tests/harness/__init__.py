"""Test libraries shared by test files and benchmarks, by concern (conftest.py files keep only fixtures).
Start with README.md here."""
