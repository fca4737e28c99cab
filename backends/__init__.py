"""Code generation backends (Apache TVM). The only package that imports ``tvm``."""
