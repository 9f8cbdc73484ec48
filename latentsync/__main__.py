from latentsync.cli import entry

entry()
