"""`python -m bridge.cli`: the same as the `maglev-bridge` command."""

from bridge.cli.main import main

raise SystemExit(main())
