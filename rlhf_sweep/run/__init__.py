"""One run of a config, end to end: the pipeline and its cache, the summary format and output layout, MLflow logging, pre-flight checks."""
