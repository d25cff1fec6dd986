// Included after LibTorch's headers and before doctest's: Debian's c10 logs
// through glog, whose CHECK(cond) macros would silently replace doctest's (and
// abort instead of reporting). Drop them before doctest defines its own.
#undef CHECK
#undef CHECK_EQ
#undef CHECK_NE
#undef CHECK_LT
#undef CHECK_LE
#undef CHECK_GT
#undef CHECK_GE
