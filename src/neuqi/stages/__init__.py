"""The steps of a job. Each reads its inputs from the job store and writes its outputs there; none
decides the order of work (that is `neuqi.pipeline.runner`)."""
