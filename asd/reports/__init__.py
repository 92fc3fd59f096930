"""What a scoring run reports: the official DCASE metrics and result CSVs (:mod:`.metrics`), Markdown
tables (:mod:`.tables`) and PNG plots (:mod:`.plots`)."""
