"""Human-in-the-loop step annotation (``she annotate serve``, docs/annotation.md): a ranked queue of the
examiner's doubtful steps, a web page for annotators, answers stored in the fact store the verifier reads."""
