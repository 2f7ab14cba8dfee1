# Compares what a whole CTest run executed with what the test binaries hold: every case of every binary must have
# run exactly once. Usage (bash cmake/quickstart.sh test does this after ctest):
#   CPET_TEST_LEDGER=<ledger> ctest --test-dir <build> ...
#   cmake -DTEST_DIR=<build>/tests -DLEDGER=<ledger> -P tests/support/check_ledger.cmake
# Each line of the ledger is "<binary> <case id>", appended by the binary's main() as a case starts
# (support/doctest_main.cpp); `<binary> --cpet-list-ids` prints the ids the binary holds.
if(NOT DEFINED TEST_DIR OR NOT DEFINED LEDGER)
  message(FATAL_ERROR "usage: cmake -DTEST_DIR=<build>/tests -DLEDGER=<file> -P check_ledger.cmake")
endif()
if(NOT EXISTS "${LEDGER}")
  message(FATAL_ERROR "cpet: no test ledger at ${LEDGER}: CTest executed no test case at all")
endif()

# the binaries of this build's configuration, one a line (written by tests/CMakeLists.txt)
if(NOT EXISTS "${TEST_DIR}/test_binaries.txt")
  message(FATAL_ERROR "cpet: no ${TEST_DIR}/test_binaries.txt (is ${TEST_DIR} a configured cpet test directory?)")
endif()
file(STRINGS "${TEST_DIR}/test_binaries.txt" _binaries)
if(NOT _binaries)
  message(FATAL_ERROR "cpet: no test binaries listed in ${TEST_DIR}/test_binaries.txt")
endif()

set(_expected)
set(_listed 0)
foreach(bin ${_binaries})
  get_filename_component(_name "${bin}" NAME)
  execute_process(COMMAND "${bin}" --cpet-list-ids OUTPUT_VARIABLE _out RESULT_VARIABLE _rc)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "cpet: ${bin} --cpet-list-ids failed (${_rc})")
  endif()
  string(REGEX REPLACE "\n$" "" _out "${_out}")
  string(REPLACE "\n" ";" _ids "${_out}")
  foreach(id ${_ids})
    list(APPEND _expected "${_name} ${id}")
    math(EXPR _listed "${_listed} + 1")
  endforeach()
endforeach()

file(STRINGS "${LEDGER}" _ran ENCODING UTF-8)
list(LENGTH _ran _ran_count)

set(_problems)
set(_remaining ${_ran})
foreach(e ${_expected})
  list(FIND _remaining "${e}" _at)
  if(_at EQUAL -1)
    list(APPEND _problems "never ran: ${e}")
  else()
    list(REMOVE_AT _remaining ${_at})
  endif()
endforeach()
foreach(r ${_remaining})
  list(APPEND _problems "ran more than once or is not listed by its binary: ${r}")
endforeach()

if(_problems)
  list(LENGTH _problems _n)
  string(REPLACE ";" "\n  " _text "${_problems}")
  message(FATAL_ERROR "cpet: the binaries list ${_listed} test cases, CTest executed ${_ran_count}; ${_n} problems:\n  ${_text}")
endif()
message(STATUS "cpet: every test case ran exactly once under CTest: ${_listed} listed, ${_ran_count} executed "
               "(from ${LEDGER})")
