"""Test libraries shared by test files and benchmarks (conftest.py files keep only fixtures)."""
