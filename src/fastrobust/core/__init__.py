"""What every part of fastrobust needs and nothing above it: the input contract, values given as text,
attack options, input gradients, precision, rank helpers, records and file writing, file-kind detection."""
