# Debian's xsimd 8.1 package exports its target with INTERFACE_LINK_LIBRARIES "xtl" although xsimd needs xtl
# only for XSIMD_ENABLE_XTL_COMPLEX, which cpet never uses; without libxtl-dev every link would then fail with
# "cannot find -lxtl". Drop that dependency when no xtl target exists.
if(TARGET xsimd AND NOT TARGET xtl)
  get_target_property(_cpet_xsimd_libs xsimd INTERFACE_LINK_LIBRARIES)
  if(_cpet_xsimd_libs)
    list(REMOVE_ITEM _cpet_xsimd_libs xtl)
    set_property(TARGET xsimd PROPERTY INTERFACE_LINK_LIBRARIES "${_cpet_xsimd_libs}")
  endif()
  unset(_cpet_xsimd_libs)
endif()
