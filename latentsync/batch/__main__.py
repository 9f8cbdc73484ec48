from latentsync.batch.command import entry

entry()
