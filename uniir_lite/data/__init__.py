"""Data: the M-BEIR format (`mbeir`) and the synthetic benchmark written in it (`synthetic`)."""
