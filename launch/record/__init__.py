"""What a run says and leaves to read: the metrics writer, the run reader, the report and its plots,
the progress line."""
