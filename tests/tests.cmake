# tests/tests.cmake: one ctest test per spec file, all run by busted inside
# rbe (tests/run.lua).  Integration and playbook specs get the throwaway
# PostgreSQL and Redis of tests/fixtures/servers.sh through a ctest fixture
# that also stops them by PID when tests fail.
set(RBE_TEST_STATE ${CMAKE_BINARY_DIR}/test-servers)

add_test(NAME servers.start
  COMMAND ${CMAKE_SOURCE_DIR}/tests/fixtures/servers.sh start ${RBE_TEST_STATE})
set_tests_properties(servers.start PROPERTIES FIXTURES_SETUP servers TIMEOUT 90)
add_test(NAME servers.stop
  COMMAND ${CMAKE_SOURCE_DIR}/tests/fixtures/servers.sh stop ${RBE_TEST_STATE})
set_tests_properties(servers.stop PROPERTIES FIXTURES_CLEANUP servers TIMEOUT 30)

file(GLOB RBE_SPECS CONFIGURE_DEPENDS
  ${CMAKE_SOURCE_DIR}/tests/unit/*_spec.lua
  ${CMAKE_SOURCE_DIR}/tests/integration/*_spec.lua
  ${CMAKE_SOURCE_DIR}/tests/playbooks/*_spec.lua)
foreach(spec ${RBE_SPECS})
  file(RELATIVE_PATH rel ${CMAKE_SOURCE_DIR}/tests ${spec})
  string(REGEX REPLACE "_spec\\.lua$" "" name ${rel})
  string(REPLACE "/" "." name ${name})
  add_test(NAME ${name}
    COMMAND $<TARGET_FILE:rbe> ${CMAKE_SOURCE_DIR}/tests/run.lua
            ${spec})
  set_tests_properties(${name} PROPERTIES
    WORKING_DIRECTORY ${CMAKE_SOURCE_DIR}
    TIMEOUT 300
    ENVIRONMENT "RBE_BIN=$<TARGET_FILE:rbe>;RBE_SOURCE_DIR=${CMAKE_SOURCE_DIR}")
  if(NOT rel MATCHES "^unit/")
    set_tests_properties(${name} PROPERTIES FIXTURES_REQUIRED servers
      ENVIRONMENT "RBE_TEST_ENV_FILE=${RBE_TEST_STATE}/env;RBE_BIN=$<TARGET_FILE:rbe>;RBE_SOURCE_DIR=${CMAKE_SOURCE_DIR}")
  endif()
endforeach()

# The CLI itself: exit codes, --help, errors with file:line.
add_test(NAME cli COMMAND ${CMAKE_SOURCE_DIR}/tests/cli.sh $<TARGET_FILE:rbe>)
set_tests_properties(cli PROPERTIES WORKING_DIRECTORY ${CMAKE_SOURCE_DIR})
