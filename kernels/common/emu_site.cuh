// Where a shared-memory helper (cp_async, ldmatrix, load_pair, store_pair, load_a, load_b) was
// called from, for the CPU emulation's model of bank conflicts (EMU_BANKS, kernels/emu/
// cuda_host.h). Host compiles give those helpers a trailing parameter that defaults to the
// caller's std::source_location; device compiles have no such parameter, so the GPU code is the
// same with or without it.
#pragma once

#ifdef __CUDA_ARCH__
#define SPARSECTR_SITE_PARAM
#define SPARSECTR_SITE_DECL
#define SPARSECTR_SITE_ARG
#else
// With its default: the primary template of a helper.
#define SPARSECTR_SITE_PARAM , ::emu::Site site = ::emu::Site::current()
// Without: an explicit specialization (which takes the primary's default).
#define SPARSECTR_SITE_DECL , ::emu::Site site
// Passes a helper's own caller on to the helper it calls.
#define SPARSECTR_SITE_ARG , site
#endif
