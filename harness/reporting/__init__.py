"""What the report and README's tables are made of: tables (pandas frames), formatting, plots, run order, ranking."""
