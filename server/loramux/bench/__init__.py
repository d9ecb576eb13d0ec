"""`loramux bench`: a workload generator and runner that measures loramux side by side with
`transformers` and PEFT on the same model and the same requests, and reports the ratios."""
