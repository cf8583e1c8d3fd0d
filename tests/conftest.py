pytest_plugins = ["tests.real.fixtures"]
