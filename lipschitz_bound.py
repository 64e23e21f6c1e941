"""placeholder until the certificate lands"""
def certify_checkpoint(path): return {"bound": float("nan")}
def summary_line(c): return f"certificate: {c}"
